"""The shared-seed bases: orthogonality, slot disjointness, random-slot overlap, bit-exact reproducibility."""

import hashlib
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peft_ortho import bases
from peft_ortho.errors import BasisError, PeftOrthoError

REPO_ROOT = Path(__file__).resolve().parents[1]


def full_basis(n, seed=0):
    return bases.basis_rows("orthogonal", seed, n, range(n))


# --------------------------------------------------------------------------------------------- orthogonality


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 31, 64, 97, 128, 257])
def test_orthogonal_basis_is_orthonormal(n):
    # odd and prime widths leave one coordinate out of every layer's Givens pairs: still orthogonal
    b = full_basis(n, seed=n)
    assert b.dtype == torch.float64 and b.shape == (n, n)
    eye = torch.eye(n, dtype=torch.float64)
    assert (b @ b.T - eye).abs().max().item() < 1e-14
    assert (b.T @ b - eye).abs().max().item() < 1e-14


@pytest.mark.parametrize("n", [8, 31, 128])
def test_orthogonal_basis_is_not_trivial(n):
    # a permutation (or identity) is orthogonal too; the rows must be spread over all coordinates
    b = full_basis(n)
    assert (b.abs() > 1e-12).float().mean().item() > 0.95
    assert b.abs().max().item() < 1.0 - 1e-3


def test_rows_are_independent_of_the_requested_subset():
    # slot rows, random rows and the full matrix must agree bit for bit, or adapters drawn differently diverge
    n = 97
    full = full_basis(n, seed=5)
    for rows in ([0], [96], [3, 50, 7], list(range(10, 30))):
        assert torch.equal(bases.basis_rows("orthogonal", 5, n, rows), full[rows])
    gfull = bases.basis_rows("gaussian", 5, n, range(n))
    assert torch.equal(bases.basis_rows("gaussian", 5, n, [40, 2]), gfull[[40, 2]])


def test_basis_rows_returns_a_copy():
    a = bases.basis_rows("orthogonal", 0, 16, [0, 1])
    a.zero_()
    assert bases.basis_rows("orthogonal", 0, 16, [0, 1]).abs().sum().item() > 0


def test_different_seeds_and_widths_give_different_bases():
    a = full_basis(64, seed=0)
    b = full_basis(64, seed=1)
    # not merely a row/sign permutation of one another: the cross products are far from a signed permutation
    cross = (a @ b.T).abs()
    assert cross.max().item() < 0.9
    assert bases.basis_checksum("orthogonal", 0, 64, [0]) != bases.basis_checksum("orthogonal", 0, 65, [0])


# --------------------------------------------------------------------------------------------- slots


@pytest.mark.parametrize(("n", "r"), [(32, 4), (97, 8), (320, 16), (144, 4)])
def test_disjoint_slots_are_exactly_orthogonal(n, r):
    full = full_basis(n, seed=3)
    slots = bases.num_slots(n, r)
    assert slots == n // r
    for i in range(slots):
        for j in range(i + 1, min(slots, i + 4)):
            a_i = full[bases.slot_rows(i, r)]
            a_j = full[bases.slot_rows(j, r)]
            assert (a_i @ a_j.T).abs().max().item() < 1e-12
            # and each slot is itself orthonormal
            assert (a_i @ a_i.T - torch.eye(r, dtype=torch.float64)).abs().max().item() < 1e-14


def test_slot_rows():
    assert bases.slot_rows(0, 4) == [0, 1, 2, 3]
    assert bases.slot_rows(3, 5) == [15, 16, 17, 18, 19]
    assert bases.shape_key(320, 16) == "320/16"


@pytest.mark.parametrize(("n", "r"), [(64, 8), (100, 10)])
def test_random_slot_overlap_matches_r_squared_over_n(n, r):
    # ‖A_i A_jᵀ‖_F² counts the shared rows: hypergeometric with mean r²/n. Seeded, so never flaky; the tolerance is
    # still > 5 standard errors of the mean, so a different seed would pass too.
    full = full_basis(n, seed=11)
    rng = random.Random(1234)
    trials = 4000
    pairs = [(bases.random_rows(n, r, rng), bases.random_rows(n, r, rng)) for _ in range(trials)]
    a_i = full[torch.tensor([p[0] for p in pairs])]  # (trials, r, n)
    a_j = full[torch.tensor([p[1] for p in pairs])]
    f2 = torch.bmm(a_i, a_j.transpose(1, 2)).pow(2).sum((1, 2))
    shared = torch.tensor([len(set(ri) & set(rj)) for ri, rj in pairs], dtype=torch.float64)
    # for an orthonormal basis ‖A_i A_jᵀ‖_F² is exactly the number of shared rows
    assert (f2 - shared).abs().max().item() < 1e-12
    values = f2.tolist()
    mean = sum(values) / trials
    expected = bases.expected_random_overlap(n, r)
    assert expected == r * r / n
    var = r * (r / n) * ((n - r) / n) * ((n - r) / (n - 1))  # hypergeometric variance
    assert abs(mean - expected) < 5 * math.sqrt(var / trials) + 1e-9
    # and it is not degenerate: some pairs are disjoint, some collide
    assert min(values) < 0.5 < max(values)


def test_random_rows_seeded_distinct_sorted_in_range():
    rows_a = bases.random_rows(50, 7, random.Random(3))
    rows_b = bases.random_rows(50, 7, random.Random(3))
    assert rows_a == rows_b
    assert rows_a == sorted(rows_a) and len(set(rows_a)) == 7
    assert all(0 <= i < 50 for i in rows_a)
    assert bases.random_rows(50, 7, random.Random(4)) != rows_a
    # unseeded: still valid rows
    rows = bases.random_rows(10, 10)
    assert rows == list(range(10))


def test_concept_slot_is_deterministic_and_in_range():
    for n, r in [(320, 16), (33, 4), (8, 8), (1280, 20)]:
        slots = bases.num_slots(n, r)
        seen = set()
        for k in range(400):
            cid = f"user{k}/concept"
            s = bases.concept_slot(cid, n, r)
            assert 0 <= s < slots
            assert bases.concept_slot(cid, n, r) == s
            seen.add(s)
        assert len(seen) == slots if slots <= 20 else len(seen) > slots // 2  # spread over the slots
    # pinned: SHA-256 based, not Python's salted hash()
    assert bases.concept_slot("alice/rex", 320, 16) == 0
    assert bases.concept_slot("bob/mia", 320, 20) == 15
    assert bases.concept_slot("x", 1280, 64) == 16


def test_concept_slot_matches_its_definition():
    cid, n, r = "ünïcode/concept", 640, 10
    digest = hashlib.sha256(cid.encode("utf-8")).digest()
    assert bases.concept_slot(cid, n, r) == int.from_bytes(digest[:8], "big") % (n // r)


# --------------------------------------------------------------------------------------------- gaussian


def test_gaussian_rows_have_unit_variance_times_one_over_n():
    n, rows = 256, list(range(64))
    g = bases.basis_rows("gaussian", 0, n, rows)
    assert g.shape == (64, n) and g.dtype == torch.float64
    x = g * math.sqrt(n)  # unit-variance entries before the 1/sqrt(n) scaling
    assert abs(x.mean().item()) < 0.05
    assert abs(x.var().item() - 1.0) < 0.05
    # Irwin-Hall of four uniforms: bounded by 2·sqrt(3), kurtosis 3 - 6/(5·4) = 2.7
    assert x.abs().max().item() <= 2 * math.sqrt(3) + 1e-12
    kurt = ((x - x.mean()) ** 4).mean().item() / x.var().item() ** 2
    assert abs(kurt - 2.7) < 0.1
    # rows have squared norm ≈ 1, distinct rows are orthogonal only in expectation (|a_i·a_j| ~ 1/sqrt(n))
    norms = g.pow(2).sum(1)
    assert (norms - 1).abs().max().item() < 0.4
    gram = g @ g.T
    off = gram - torch.diag(torch.diag(gram))
    assert off.abs().max().item() < 6 / math.sqrt(n)
    assert off.abs().max().item() > 1e-3  # not orthogonal: that is the point of the alternative


def test_gaussian_basis_differs_from_orthogonal_and_by_seed():
    a = bases.basis_rows("gaussian", 0, 32, [0, 1])
    assert not torch.equal(a, bases.basis_rows("gaussian", 1, 32, [0, 1]))
    assert not torch.equal(a, bases.basis_rows("orthogonal", 0, 32, [0, 1]))


# --------------------------------------------------------------------------------------------- errors


def test_unknown_basis_kind():
    with pytest.raises(BasisError, match="unknown basis 'haar'"):
        bases.basis_rows("haar", 0, 8, [0])
    assert issubclass(BasisError, ValueError) and issubclass(BasisError, PeftOrthoError)


@pytest.mark.parametrize(
    ("kind", "rows"),
    [("orthogonal", [0, 8]), ("orthogonal", [-1, 0]), ("orthogonal", [100]), ("gaussian", [-1])],
)
def test_rows_out_of_range(kind, rows):
    with pytest.raises(BasisError, match="out of range"):
        bases.basis_rows(kind, 0, 8, rows)


def test_empty_rows():
    assert bases.basis_rows("orthogonal", 0, 8, []).shape == (0, 8)


# --------------------------------------------------------------------------------------------- checksums


# Computed once from the "givens-butterfly-v1" code; any change to the algorithm's outputs must fail here (and
# bump ALGORITHM_VERSION), because every adapter ever saved records these checksums.
GOLDEN = [
    (("orthogonal", 0, 8, [0, 1, 2, 3]), "353316aafc0df3d9"),
    (("orthogonal", 0, 320, list(range(16, 32))), "bc7219418890448c"),
    (("orthogonal", 1234, 97, [0, 5, 96]), "77748dc4dda50b62"),
    (("orthogonal", 7, 1280, list(range(40))), "b8b905e4827f5741"),
    (("gaussian", 0, 320, list(range(16))), "325ab0f6cca1fe50"),
    (("gaussian", 3, 33, [2, 4, 8]), "90b63a40a3707b68"),
]


@pytest.mark.parametrize(("args", "digest"), GOLDEN, ids=[f"{a[0]}-{a[1]}-{a[2]}" for a, _ in GOLDEN])
def test_golden_checksums(args, digest):
    assert bases.ALGORITHM_VERSION == "givens-butterfly-v1"
    assert bases.basis_checksum(*args) == digest
    assert bases.checksum(bases.basis_rows(*args)) == digest


def test_golden_values():
    # a few raw values too, so a checksum-function change cannot hide an algorithm change
    b = bases.basis_rows("orthogonal", 0, 4, [0, 1, 2, 3])
    expected = torch.tensor(
        [
            [-0.3019, 0.6086, 0.2322, -0.6961],
            [-0.2232, -0.4454, 0.8670, -0.0034],
            [-0.8645, -0.3193, -0.3867, -0.0333],
            [0.3342, -0.5738, -0.2116, -0.7172],
        ],
        dtype=torch.float64,
    )
    assert (b - expected).abs().max().item() < 1e-4


def test_checksum_is_sensitive_to_one_ulp():
    a = bases.basis_rows("orthogonal", 0, 32, [0, 1])
    b = a.clone()
    b[1, 7] = torch.nextafter(b[1, 7], torch.tensor(2.0, dtype=torch.float64))
    assert bases.checksum(a) != bases.checksum(b)
    assert len(bases.checksum(a)) == 16
    # hashes float64 values: a float32-rounded copy is a different basis
    assert bases.checksum(a.float()) != bases.checksum(a)


# The child imports only peft_ortho.bases (and .errors) under a bare package stub: the same code, without paying
# for peft/transformers/diffusers imports twice. The parent process, which compares, has the full package loaded.
_CHILD = r"""
import hashlib, json, os, sys, types
import torch
torch.set_num_threads(int(sys.argv[1]))
pkg = types.ModuleType("peft_ortho")
pkg.__path__ = [os.path.join(sys.argv[3], "peft_ortho")]
sys.modules["peft_ortho"] = pkg
from peft_ortho import bases
out = {"threads": torch.get_num_threads()}
for kind, seed, n, rows in json.loads(sys.argv[2]):
    a = bases.basis_rows(kind, seed, n, rows)
    key = f"{kind}-{seed}-{n}-{len(rows)}"
    out[key] = {
        "checksum": bases.checksum(a),
        "f64": hashlib.sha256(a.numpy().tobytes()).hexdigest(),
        "f32": hashlib.sha256(a.to(torch.float32).numpy().tobytes()).hexdigest(),
        "bf16": hashlib.sha256(a.to(torch.bfloat16).view(torch.int16).numpy().tobytes()).hexdigest(),
    }
out["slot"] = bases.concept_slot("alice/rex", 320, 16)
out["hashseed"] = hash("alice/rex")
print(json.dumps(out))
"""

_CASES = [
    ("orthogonal", 0, 320, list(range(32, 48))),
    ("orthogonal", 99, 257, [0, 100, 256]),
    ("orthogonal", 5, 1024, list(range(8))),
    ("gaussian", 0, 77, list(range(5))),
]


def _digests_here():
    out = {}
    for kind, seed, n, rows in _CASES:
        a = bases.basis_rows(kind, seed, n, rows)
        out[f"{kind}-{seed}-{n}-{len(rows)}"] = {
            "checksum": bases.checksum(a),
            "f64": hashlib.sha256(a.numpy().tobytes()).hexdigest(),
            "f32": hashlib.sha256(a.to(torch.float32).numpy().tobytes()).hexdigest(),
            "bf16": hashlib.sha256(a.to(torch.bfloat16).view(torch.int16).numpy().tobytes()).hexdigest(),
        }
    return out


def test_bit_identical_across_processes_and_thread_counts():
    env = dict(os.environ)
    procs = []
    for threads, hashseed in ((1, "1"), (2, "2")):
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(threads), json.dumps(_CASES), str(REPO_ROOT)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**env, "PYTHONHASHSEED": hashseed},
                cwd=str(REPO_ROOT),
            )
        )
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    one, two = results
    assert one.pop("threads") == 1 and two.pop("threads") == 2
    # the children really ran with different hash seeds, so concept_slot cannot be leaning on hash()
    assert one.pop("hashseed") != two.pop("hashseed")
    assert one == two
    here = _digests_here()
    assert one.pop("slot") == bases.concept_slot("alice/rex", 320, 16)
    assert one == here
    # the recorded checksums are the ones the config would record
    for kind, seed, n, rows in _CASES:
        assert here[f"{kind}-{seed}-{n}-{len(rows)}"]["checksum"] == bases.basis_checksum(kind, seed, n, rows)


def test_num_layers():
    assert bases.num_layers(2) == 6
    assert bases.num_layers(320) == 4 * 9 + 2
    assert bases.num_layers(512) == 4 * 9 + 2
    assert bases.num_layers(513) == 4 * 10 + 2
