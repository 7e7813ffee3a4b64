"""The log's Merkle tree (RFC 6962 §2.1 / RFC 9162 §2.1, SHA-256): hashing, proofs and their checks.

Pure functions, no I/O. A tree is addressed by its *complete subtrees*: ``(level, index)`` covers
the ``2**level`` leaves from ``index * 2**level``; level 0 is the leaves. Those hashes never change
once the subtree is full, so storage keeps each one and the generators here read them through a
``NodeSource``. Any range a proof needs (``MTH(D[a:b])`` with ``a`` aligned, ``b`` at most the tree
size) is either one complete subtree or, on the right edge of a tree whose size is not a power of
two, the right fold of the complete subtrees of its binary decomposition: so a proof costs
O(log n) reads.

Verification follows RFC 9162 §2.1.3.2 (inclusion) and §2.1.4.2 (consistency) and raises
``ProofError`` naming what failed. The expected proof length is checked first, so a truncated or
padded proof is refused as such rather than as a hash mismatch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()  # MTH({}) (RFC 9162 §2.1.1)
_LEAF = b"\x00"
_NODE = b"\x01"

Address = tuple[int, int]  # (level, index) of a complete subtree
NodeSource = Callable[[int, int], bytes]  # (level, index) -> that subtree's hash


class ProofError(ValueError):
    """A proof, a tree size or a hash that does not verify; the message says which and why."""


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``: the hash of one log entry."""
    return hashlib.sha256(_LEAF + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``: the hash of an interior node."""
    return hashlib.sha256(_NODE + left + right).digest()


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH of a whole list of leaf hashes (in memory; storage uses ``range_hash``)."""
    if not leaf_hashes:
        return EMPTY_ROOT
    # Pairing left to right and carrying an odd last node up a level builds exactly the tree of
    # RFC 6962's split at the largest power of two below n.
    level = list(leaf_hashes)
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def range_addresses(start: int, end: int) -> list[Address]:
    """The complete subtrees, largest first, whose right fold is ``MTH(D[start:end])``.

    ``start`` must be a multiple of the largest power of two not above ``end - start`` (true of
    every range the RFC's proofs and roots use)."""
    addresses = []
    while start < end:
        level = (end - start).bit_length() - 1
        addresses.append((level, start >> level))
        start += 1 << level
    return addresses


def range_hash(nodes: NodeSource, start: int, end: int) -> bytes:
    """``MTH(D[start:end])`` from stored complete-subtree hashes (see ``range_addresses``)."""
    if start == end:
        return EMPTY_ROOT
    addresses = range_addresses(start, end)
    level, index = addresses[-1]
    result = nodes(level, index)
    for level, index in reversed(addresses[:-1]):
        result = node_hash(nodes(level, index), result)
    return result


def tree_root(nodes: NodeSource, size: int) -> bytes:
    """The root of the tree of the first ``size`` leaves."""
    return range_hash(nodes, 0, size)


def _inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """PATH(index, D[0:size]) (RFC 9162 §2.1.3.1) as leaf ranges, leaf-side first."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not in a tree of size {size}")
    ranges = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start += k
    ranges.reverse()
    return ranges


def _consistency_ranges(old_size: int, new_size: int) -> list[tuple[int, int]]:
    """PROOF(old_size, D[0:new_size]) (RFC 9162 §2.1.4.1) as leaf ranges, in proof order."""
    if not 0 <= old_size <= new_size:
        raise ProofError(f"no consistency proof from size {old_size} to size {new_size}")
    if old_size in (0, new_size):
        return []
    ranges = []
    # ``whole``: SUBPROOF's flag b, true while the old tree is a complete left subtree of D[start:end].
    start, end, whole = 0, new_size, True
    m = old_size
    while m != end - start:
        k = _split(end - start)
        if m <= k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            m -= k
            start += k
            whole = False
    if not whole:
        ranges.append((start, end))  # SUBPROOF's base case with b = false: MTH(D[m]) itself
    ranges.reverse()
    return ranges


def inclusion_addresses(index: int, size: int) -> set[Address]:
    """Every stored node ``inclusion_proof(index, size, ...)`` reads (to fetch them in one query)."""
    return {a for start, end in _inclusion_ranges(index, size) for a in range_addresses(start, end)}


def consistency_addresses(old_size: int, new_size: int) -> set[Address]:
    """Every stored node ``consistency_proof(old_size, new_size, ...)`` reads."""
    ranges = _consistency_ranges(old_size, new_size)
    return {a for start, end in ranges for a in range_addresses(start, end)}


def inclusion_proof(index: int, size: int, nodes: NodeSource) -> list[bytes]:
    """The audit path of leaf ``index`` in the tree of size ``size`` (RFC 9162 §2.1.3.1)."""
    return [range_hash(nodes, start, end) for start, end in _inclusion_ranges(index, size)]


def consistency_proof(old_size: int, new_size: int, nodes: NodeSource) -> list[bytes]:
    """The consistency proof from the tree of ``old_size`` leaves to that of ``new_size`` (§2.1.4.1)."""
    return [range_hash(nodes, start, end) for start, end in _consistency_ranges(old_size, new_size)]


def _check_hash(value: bytes, what: str) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{what} is {len(value)} bytes, not {HASH_SIZE}")


def _check_proof(proof: Sequence[bytes], expected: int, context: str) -> None:
    if len(proof) != expected:
        raise ProofError(f"the proof has {len(proof)} hashes; {context} takes {expected}")
    for position, value in enumerate(proof):
        _check_hash(value, f"proof hash {position}")


def inclusion_proof_length(index: int, size: int) -> int:
    """How many hashes the inclusion proof of ``index`` in a tree of ``size`` leaves holds."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not in a tree of size {size}")
    # Below the level where index's and the last leaf's paths meet, every level gives one hash;
    # above it, only the levels where the path turns right (a complete left sibling) do.
    inner = (index ^ (size - 1)).bit_length()
    return inner + (index >> inner).bit_count()


def _climb(fn: int, sn: int) -> tuple[int, int]:
    """Right-shift both until ``fn``'s lowest bit is set or ``fn`` is 0 (RFC 9162 §2.1.3.2 step 3)."""
    if fn == 0:
        return fn, sn
    shift = (fn & -fn).bit_length() - 1
    return fn >> shift, sn >> shift


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], expected_root: bytes
) -> None:
    """Check that ``leaf`` is leaf ``index`` of the tree of ``size`` leaves with root ``expected_root``
    (RFC 9162 §2.1.3.2); raise ``ProofError`` if not."""
    _check_hash(leaf, "the leaf hash")
    _check_hash(expected_root, "the root hash")
    _check_proof(proof, inclusion_proof_length(index, size), f"index {index} in a tree of size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                # A last node with no right sibling: climb to where it becomes a right child.
                fn, sn = _climb(fn, sn)
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:  # unreachable after the length check; kept as the RFC's own final condition
        raise ProofError(f"the proof is too short for index {index} in a tree of size {size}")
    if r != expected_root:
        raise ProofError(
            f"the proof does not lead from the leaf hash to the root of size {size} at index {index}"
        )


def consistency_proof_length(old_size: int, new_size: int) -> int:
    """How many hashes the consistency proof from ``old_size`` to ``new_size`` holds."""
    if not 0 <= old_size <= new_size:
        raise ProofError(f"no consistency proof from size {old_size} to size {new_size}")
    if old_size in (0, new_size):
        return 0
    # The old tree's last complete subtree is a node of the new tree: the proof is its inclusion
    # path there, plus the node itself unless it is the whole old tree (old size a power of two).
    level = (old_size & -old_size).bit_length() - 1
    length = inclusion_proof_length((old_size - 1) >> level, ((new_size - 1) >> level) + 1)
    return length + (0 if old_size == 1 << level else 1)


def _check_trivial_consistency(old_size: int, old_root: bytes, new_root: bytes) -> None:
    """The cases with an empty proof: from the empty tree, and between two trees of one size."""
    if old_size == 0 and old_root != EMPTY_ROOT:
        raise ProofError("the old root is not the empty tree's root, and the old size is 0")
    if old_size != 0 and old_root != new_root:
        raise ProofError(f"two different roots for the same size {old_size}")


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of ``old_size`` leaves with ``old_root`` is a prefix of the tree of
    ``new_size`` leaves with ``new_root`` (RFC 9162 §2.1.4.2); raise ``ProofError`` if not."""
    _check_hash(old_root, "the old root hash")
    _check_hash(new_root, "the new root hash")
    context = f"size {old_size} to size {new_size}"
    _check_proof(proof, consistency_proof_length(old_size, new_size), context)
    if old_size in (0, new_size):
        _check_trivial_consistency(old_size, old_root, new_root)
        return
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is the proof's implicit first node
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:  # unreachable after the length check; kept as the RFC's own condition
            raise ProofError(f"the proof is too long for {context}")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                fn, sn = _climb(fn, sn)
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError(f"the proof is too short for {context}")
    if fr != old_root:
        raise ProofError(f"the proof does not lead to the old root ({context})")
    if sr != new_root:
        raise ProofError(f"the proof does not lead to the new root ({context})")
