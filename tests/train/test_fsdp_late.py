"""``lorakit.inject`` on a model already sharded by FSDP2 (2 gloo ranks, worker: fsdp_late_worker.py).

References: the same model injected *before* ``fully_shard`` (the path ``lorakit train --fsdp`` takes) and
one unsharded process training on the whole global batch (plain PyTorch SGD, same seed).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_fsdp import run_worker


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_inject_after_fully_shard_equals_inject_before_and_one_process(tmp_path: Path) -> None:
    for r in run_worker("fsdp_late_worker.py", tmp_path, timeout=220, LORAKIT_DIST_TIMEOUT="120"):
        assert r["late_layers"] == 6 and r["trainable_same"]
        assert r["init_A"] == 0.0  # rank 1 drew with another seed: inject broadcast rank 0's factors
        # 2 SGD steps, each rank half the batch: the same losses as inject-before-shard and as 1 process
        for late, early, ref in zip(r["loss_late"], r["loss_early"], r["loss_ref"], strict=True):
            assert abs(late - ref) <= 1e-5 * abs(ref) and abs(late - early) <= 1e-6 * abs(ref)
        assert r["loss_ref"][1] != r["loss_ref"][0]  # the first step changed the adapter
        assert r["base_untouched"]  # the frozen sharded base got no update
        assert r["forward_late_ref"] < 1e-6 and r["forward_late_early"] < 1e-6
        assert r["trained_vs_base"] > 1e-3  # ... and the trained adapter does change the output
        assert r["disabled_vs_base"] == 0.0
        assert r["merge_changed_weight"] and r["merged_vs_ref"] < 1e-6
        assert r["unmerge_bits"] and r["unmerged_vs_ref"] < 1e-6
        assert r["saved_keys"] and r["saved"] < 1e-6
        # DoRA needs the full W0: refused by module name, model unchanged
        assert "model.layers.0.self_attn.q_proj" in r["dora_late"] and "before fully_shard" in r["dora_late"]
        assert r["dora_unchanged"] and r["dora_forward"] == 0.0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_merge_after_a_no_grad_forward_writes_the_root_units_shards(tmp_path: Path) -> None:
    """A forward under no_grad leaves FSDP2's root unit unsharded; ``lorakit.merge`` / ``unmerge`` (and
    ``disable_adapters`` on a merged model: it raised torch's "mixed torch.Tensor and DTensor") then must
    still change the shards (worker: fsdp_root_merge_worker.py), else the merge vanishes at the next reshard
    (measured without it: outputs 3.2 off the 1-process merged model, weights 2.9). Also: an inject after
    fully_shard whose broadcast fails leaves the model unchanged; inject, unwrap, inject again works."""
    for r in run_worker("fsdp_root_merge_worker.py", tmp_path, timeout=100):
        assert set(r["state_before_merge"]) == {"UNSHARDED"}  # the case under test
        assert r["merge_wrote_shards"]
        assert r["merged_fwd"] < 1e-6 and r["merged_after_reshard"] < 1e-6 and r["merged_weight"] < 1e-6
        assert r["disabled"] < 1e-6 and r["remerged_after_reshard"] < 1e-6  # disable_adapters on it too
        assert r["unmerge_bits"] and r["unmerged_after_reshard"] < 1e-6
        assert r["recomputed_unmerged"] < 1e-6
        # inject after fully_shard whose broadcast fails (a timed-out collective): model as it was, retry works
        assert "Timed out" in r["failed_error"] and r["failed_unchanged"] and r["failed_forward"]
        assert r["retry_layers"] and r["retry_forward"]
        # inject, unwrap, inject again after fully_shard (was refused: the base had become a shared module)
        assert r["reinject"] == "ok" and r["reinject_vs_ref"] < 1e-6


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_every_base_weight_write_reshards_a_gathered_root_unit_first(tmp_path: Path) -> None:
    """The writes that bypass ``lorakit.merge`` (worker: fsdp_layer_merge_worker.py) on the root unit after a
    no_grad forward, vs one unsharded process: a direct ``layer.merge()`` was lost at the next reshard
    (measured without lorakit.fsdp_reshard: 3.19 off the merged model, 6e-8 from the bare base) and a
    mixed-adapter batch's re-merge on exit and a target_parameters load into a merged model raised torch's
    "mixed torch.Tensor and DTensor"."""
    for r in run_worker("fsdp_layer_merge_worker.py", tmp_path, timeout=100):
        assert set(r["state_before"]) == {"UNSHARDED"}  # the case under test
        assert r["layer_merge"] < 1e-6 and r["layer_merge_vs_base"] > 1.0  # merged, and the merge moved it
        assert r["layer_unmerge"] < 1e-6
        assert r["load_into_merged"] < 1e-6 and r["load_vs_other"] < 1e-6  # load_adapter into a merged model
        assert r["mixed_rows"] < 1e-6 and r["mixed_exit_remerged"] < 1e-6  # batch_adapters' exit re-merges
        # target_parameters (LoraParameter, writing its owner's Parameter): merge, load_adapter into merged
        assert r["param_merge"] < 1e-6 and r["param_load_into_merged"] < 1e-6 and r["param_load_vs_other"] < 1e-6
