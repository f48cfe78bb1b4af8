"""Backbone fingerprint: a cheap, device- and dtype-independent identity of a backbone checkpoint.

OpenDelta hashed the string form of the model and every parameter (slow on big models, and
different on every device). Here each backbone parameter contributes its canonical name, its
logical shape and ``SAMPLES_PER_TENSOR`` values at fixed, evenly spaced flat positions. Sampling
goes through the engine, so a sharded parameter only contributes the few values asked for, never a
full gather; the cost per tensor is independent of its size (well under a second for a 1B model on
CPU, see ``python -m benchmarks run --only fingerprint``).

A :class:`Fingerprint` keeps three views of those samples:

- ``digest``: SHA-256 of names, shapes and the samples rounded to bfloat16 -- the format that
  checkpoints store as ``backbone_hash``. Equal digests mean the same backbone at once, and a
  checkpoint that stores only the digest is still checked by exact comparison.
- ``structure``: SHA-256 of names and shapes only, to tell "another architecture" apart.
- the float32 samples themselves (``samples_text`` for a JSON config), compared with a tolerance.

Why a tolerance: rounding to bfloat16 makes an fp32 checkpoint and its bf16 copy hash alike, but
not its fp16 copy -- fp32 -> fp16 -> bf16 rounds twice and ~6% of values land on the other side
of a bf16 rounding boundary. Comparing the samples within the rounding error of the dtypes a
checkpoint is loaded in (:data:`RTOL`, :data:`ATOL`) accepts fp32, bf16 and fp16 copies of one
checkpoint, still refuses another checkpoint (or the same one changed by ~1%), and names the
tensors that differ. Two checkpoints of one architecture differ in practically every weight, so a
few samples per tensor tell them apart.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
import struct
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from deltadist.addressing.names import canonical_parameters
from deltadist.core.attach import delta_modules
from deltadist.engines import Engine
from deltadist.errors import CheckpointError

SAMPLES_PER_TENSOR = 16

# Tolerance of one sample, |stored - current| <= RTOL * max(|stored|, |current|) + ATOL.
# Legitimate differences are rounding errors of copies of one checkpoint: bf16 keeps 8 significant
# bits (relative error <= 2^-8 = 0.39%), fp16 keeps 11 (<= 2^-11 = 0.049%), so the worst pair, a
# bf16 copy against an fp16 copy of an fp32 checkpoint, differs by <= 2^-8 + 2^-11 = 0.44%.
# RTOL = 2^-7 = 0.78% is twice the bf16 error (room for one more rounding, e.g. a bf16 copy made
# from the fp16 one) and below the 1 - 1/1.01 = 0.99% by which weights scaled by 1.01 differ.
# Against samples stored from a bf16 copy, one sample of such a change may shrink to
# 0.99% - 0.39% = 0.6% and pass; the tensor's other samples (16) still show it.
RTOL = 2.0**-7
# fp16 has no relative guarantee below its smallest normal 2^-14 (6.1e-5): subnormals are spaced
# 2^-24 (6.0e-8) apart, so rounding (or underflow to zero) moves a value by up to 2^-25 (3.0e-8).
# ATOL = 2^-24 covers that twice over; it hides a 1% change only in values below 6e-6, far below
# typical weights (~1e-2), and every tensor has 16 samples.
ATOL = 2.0**-24

STRUCTURE_DIFFERS = "<parameter names or logical shapes>"
"""What :meth:`Fingerprint.differing_tensors` lists when the architecture differs (no name
can be blamed: only a hash of the names and shapes is stored)."""
DIGEST_DIFFERS = "<backbone digest>"
"""What :meth:`Fingerprint.differing_tensors` lists when a checkpoint stored only the digest
(written before samples were stored) and it differs: which tensor differs is unknown."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Fingerprint:
    """Identity of a backbone's parameters; built by :func:`backbone_fingerprint`."""

    digest: str
    """SHA-256 hex of names, logical shapes and samples rounded to bf16 (``backbone_hash``)."""
    structure: str
    """SHA-256 hex of names and logical shapes only."""
    names: tuple[str, ...]
    """Canonical names of the fingerprinted parameters, sorted."""
    counts: tuple[int, ...]
    """Samples per parameter, aligned with ``names``: ``min(SAMPLES_PER_TENSOR, numel)``."""
    samples: tuple[float, ...]
    """The sampled values as float32 (held as Python floats), ``names`` order, ``sum(counts)``."""

    @property
    def samples_text(self) -> str:
        """``"<structure>:<base64 of the float32 little-endian samples>"``, for a JSON config.

        About 86 characters per parameter: ~62 KB for a 70B Llama (723 parameters).
        """
        raw = struct.pack(f"<{len(self.samples)}f", *self.samples)
        return f"{self.structure}:{base64.b64encode(raw).decode('ascii')}"

    def differing_tensors(
        self, stored_digest: str, stored_samples_text: str | None = None
    ) -> list[str]:
        """Canonical names of this backbone's parameters that differ from a stored fingerprint.

        Args:
            stored_digest: the stored :attr:`digest` (a checkpoint's ``backbone_hash``).
            stored_samples_text: the stored :attr:`samples_text`, or ``None`` for a checkpoint that
                kept only the digest.

        Returns:
            ``[]`` for the same backbone: equal digests, or every sample within
            ``RTOL``/``ATOL`` (an fp32, bf16 or fp16 copy of it). ``[STRUCTURE_DIFFERS]`` if the
            names or logical shapes differ, ``[DIGEST_DIFFERS]`` if only a digest is stored and
            it differs, else the names of the parameters with a sample out of tolerance.

        Raises:
            CheckpointError: ``stored_samples_text`` is malformed or does not hold one sample
                per position of this structure (a damaged config).
        """
        if stored_digest == self.digest:
            return []
        if stored_samples_text is None:
            return [DIGEST_DIFFERS]
        structure, stored = parse_samples_text(stored_samples_text)
        if structure != self.structure:
            return [STRUCTURE_DIFFERS]
        if len(stored) != len(self.samples):
            raise CheckpointError(
                f"The stored backbone samples hold {len(stored)} values, but these parameter "
                f"names and shapes need {len(self.samples)} ({SAMPLES_PER_TENSOR} per tensor): the "
                "config is damaged or written by another deltadist version. Save the delta again, "
                "or pass check_hash=False to load it without checking the backbone."
            )
        current = torch.tensor(self.samples, dtype=torch.float32)
        owner = torch.repeat_interleave(
            torch.arange(len(self.names)), torch.tensor(self.counts, dtype=torch.long)
        )
        differing = owner[~samples_agree(stored, current)].unique().tolist()
        return [self.names[i] for i in differing]


def samples_agree(stored: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Which samples agree within ``RTOL``/``ATOL``.

    NaN marks a value the fingerprint cannot know -- a weight stored in 4 bits, whose samples
    differ from the full-precision checkpoint's by far more than any dtype rounds -- and agrees
    with anything, so a delta trained on an NF4 backbone loads onto its full-precision checkpoint
    and back (the tensors that are not quantized, embeddings and norms, still tell checkpoints
    apart). An infinity agrees only with itself: a finite value that became inf (fp16 overflows
    above 65504) changed the model's outputs.

    Args:
        stored, current: samples of shape ``(n,)``.

    Returns:
        Bool tensor of shape ``(n,)``.
    """
    a, b = stored.double(), current.double()
    bound = RTOL * torch.maximum(a.abs(), b.abs()) + ATOL
    within = a.isfinite() & b.isfinite() & ((a - b).abs() <= bound)
    return within | (a == b) | a.isnan() | b.isnan()


def parse_samples_text(text: str) -> tuple[str, torch.Tensor]:
    """Inverse of :attr:`Fingerprint.samples_text`.

    Returns:
        The structure hex and the samples, float32 of shape ``(n,)``.

    Raises:
        CheckpointError: ``text`` is not ``"<64 hex digits>:<base64 of float32 values>"``.
    """
    structure, _, encoded = text.partition(":")
    try:
        raw = base64.b64decode(encoded, validate=True)
        valid = re.fullmatch(r"[0-9a-f]{64}", structure) is not None and len(raw) % 4 == 0
    except binascii.Error:
        valid = False
    if not valid:
        raise CheckpointError(
            f"The stored backbone samples {text[:40]!r}... are not '<structure hex>:<base64 "
            "float32>': the config is damaged. Save the delta again, or pass check_hash=False to "
            "load it without checking the backbone."
        )
    return structure, torch.tensor(struct.unpack(f"<{len(raw) // 4}f", raw), dtype=torch.float32)


@functools.lru_cache(maxsize=256)
def sample_positions(numel: int) -> torch.Tensor:
    """Evenly spaced flat indices (first and last included) of a tensor with ``numel`` values.
    Cached by size (a model repeats a few shapes); the returned tensor is shared: never write to it."""
    count = min(SAMPLES_PER_TENSOR, numel)
    return torch.linspace(0, numel - 1, steps=count, dtype=torch.float64).round().long()


def backbone_fingerprint(
    backbone: nn.Module, engine: Engine, skip_names: Iterable[str] = ()
) -> Fingerprint | None:
    """Fingerprint of ``backbone``'s own parameters, or ``None`` if any is on ``meta``.

    Call on every rank: sampling a sharded parameter is a collective.

    Args:
        backbone: the model; parameters of attached deltas are never part of it.
        engine: answers logical shapes and samples of sharded parameters.
        skip_names: canonical names left out (backbone parameters a delta checkpoint carries).
    """
    engine.settle(backbone)
    kept = fingerprinted_parameters(backbone, skip_names, engine.logical_shape)
    # All tensors' samples in one request: a sharding engine sums them in one collective per group.
    sampled = engine.sample_many([(param, sample_positions(shape.numel())) for _, param, shape in kept
                                  if shape.numel() > 0])
    if any(values is None for values in sampled):
        return None
    return fingerprint_of([(name, shape) for name, _, shape in kept], sampled)


def fingerprinted_parameters(
    backbone: nn.Module, skip_names: Iterable[str] = (),
    logical_shape: Callable[[nn.Parameter], torch.Size] = lambda param: param.shape,
) -> list[tuple[str, nn.Parameter, torch.Size]]:
    """``(canonical name, parameter, logical shape)`` of each parameter a fingerprint covers, sorted
    by name: the backbone's own, less ``skip_names`` and the parameters of attached deltas."""
    skip = set(skip_names)
    delta_params = {id(p) for m in delta_modules(backbone).values() for p in m.parameters()}
    return [(name, param, logical_shape(param))
            for name, param in sorted(canonical_parameters(backbone).items())
            if name not in skip and id(param) not in delta_params]


def fingerprint_of(kept: list[tuple[str, torch.Size]], sampled: list[torch.Tensor]) -> Fingerprint:
    """The fingerprint of tensors ``kept`` (sorted ``(name, logical shape)``) whose samples at
    :func:`sample_positions` are ``sampled`` (float64, one per non-empty tensor, in order): from a
    model's parameters, or read from a checkpoint's files."""
    digest, structure = hashlib.sha256(), hashlib.sha256()
    names: list[str] = []
    counts: list[int] = []
    # One conversion for all samples (not a few small ops per tensor): the digest rounds the
    # float64 samples to bf16 as checkpoints' backbone_hash always has, so old checkpoints (digest
    # only) still compare equal.
    every = torch.cat([torch.zeros(0, dtype=torch.float64), *sampled])
    rounded = every.to(torch.bfloat16).to(torch.float32).numpy().tobytes()
    samples = every.to(torch.float32).tolist()
    sizes = iter(len(values) for values in sampled)
    start = 0
    for name, shape in kept:
        entry = f"{name}:{tuple(shape)};".encode()
        digest.update(entry)
        structure.update(entry)
        end = start + (next(sizes) if shape.numel() > 0 else 0)
        digest.update(rounded[4 * start:4 * end])
        names.append(name)
        counts.append(end - start)
        start = end
    return Fingerprint(
        digest=digest.hexdigest(), structure=structure.hexdigest(), names=tuple(names),
        counts=tuple(counts), samples=tuple(samples),
    )
