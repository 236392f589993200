"""The fast path and its kernels, one room: how an adapted linear layer's forward and backward run.

* :mod:`.dispatch` — the layers' entry (:func:`~.dispatch.linear_forward`), switches, eligibility.
* :mod:`.fused` — the training ``autograd.Function`` (in-place update, folded scaling, hashed dropout).
* :mod:`.decode` — the no-autograd forward (token-by-token decoding in one C++ call per layer).
* :mod:`.dropout` — the counter-based dropout mask and the masks shared by sibling projections.
* :mod:`.cpu` — the C++ extension (source in ``csrc/``), built on first use, None when unavailable.
"""
