"""The Merkle tree against RFC 6962's own recursive definitions and the Certificate Transparency
test vectors, and every kind of tampering refused with a reason."""

from __future__ import annotations

import hashlib
import random
import time

import pytest

from lucerna.audit import merkle
from lucerna.audit.merkle import EMPTY_ROOT, ProofError

pytestmark = pytest.mark.unit

# The RFC 6962 test vectors used by Certificate Transparency implementations (values only): eight
# leaves, and the tree head of each size 1..8.
_VECTOR_LEAVES_HEX = (
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
)
VECTOR_LEAVES = [bytes.fromhex(h) for h in _VECTOR_LEAVES_HEX]
VECTOR_ROOTS = [
    bytes.fromhex(h)
    for h in (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    )
]
# (leaf index, tree size, audit path)
VECTOR_INCLUSION = [
    (0, 1, []),
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]
# (old size, new size, consistency proof)
VECTOR_CONSISTENCY = [
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (
        6,
        7,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
]


# --- The reference: RFC 6962 §2.1's recursive definitions, transcribed as directly as possible ---


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(d: list[bytes]) -> bytes:
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = _k(len(d))
    return hashlib.sha256(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:])).digest()


def ref_path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = _k(len(d))
    if m < k:
        return [*ref_path(m, d[:k]), ref_mth(d[k:])]
    return [*ref_path(m - k, d[k:]), ref_mth(d[:k])]


def ref_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = _k(n)
    if m <= k:
        return [*ref_subproof(m, d[:k], b), ref_mth(d[k:])]
    return [*ref_subproof(m - k, d[k:], False), ref_mth(d[:k])]


def ref_proof(m: int, d: list[bytes]) -> list[bytes]:
    return ref_subproof(m, d, True) if 0 < m < len(d) else []


class Tree:
    """Every complete subtree's hash of a list of entries, as storage keeps them."""

    def __init__(self, entries: list[bytes]) -> None:
        self.entries = entries
        self.nodes: dict[tuple[int, int], bytes] = {}
        level = [merkle.leaf_hash(e) for e in entries]
        height = 0
        while level:
            for index, value in enumerate(level):
                self.nodes[(height, index)] = value
            level = [merkle.node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            height += 1
        self.reads = 0

    def node(self, level: int, index: int) -> bytes:
        self.reads += 1
        return self.nodes[(level, index)]

    def leaf(self, index: int) -> bytes:
        return self.nodes[(0, index)]

    def root(self, size: int) -> bytes:
        return merkle.tree_root(self.node, size)


def _entries(n: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randrange(0, 40)) for _ in range(n)]


def _flip(value: bytes, bit: int = 0) -> bytes:
    return bytes([value[0] ^ (1 << bit), *value[1:]])


# --- Known answers ---------------------------------------------------------------------------------


def test_empty_tree_and_leaf_prefixes() -> None:
    sha256_of_nothing = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert merkle.root([]) == EMPTY_ROOT == bytes.fromhex(sha256_of_nothing)
    assert merkle.leaf_hash(b"") == VECTOR_ROOTS[0]
    leaves = [merkle.leaf_hash(e) for e in VECTOR_LEAVES[:2]]
    assert merkle.node_hash(*leaves) == VECTOR_ROOTS[1]


def test_roots_match_the_vectors() -> None:
    leaves = [merkle.leaf_hash(e) for e in VECTOR_LEAVES]
    tree = Tree(VECTOR_LEAVES)
    for size in range(1, 9):
        assert merkle.root(leaves[:size]) == VECTOR_ROOTS[size - 1], size
        assert tree.root(size) == VECTOR_ROOTS[size - 1], size


@pytest.mark.parametrize(("index", "size", "path"), VECTOR_INCLUSION)
def test_inclusion_vectors(index: int, size: int, path: list[str]) -> None:
    tree = Tree(VECTOR_LEAVES)
    proof = [bytes.fromhex(h) for h in path]
    assert merkle.inclusion_proof(index, size, tree.node) == proof
    merkle.verify_inclusion(tree.leaf(index), index, size, proof, VECTOR_ROOTS[size - 1])


@pytest.mark.parametrize(("old", "new", "path"), VECTOR_CONSISTENCY)
def test_consistency_vectors(old: int, new: int, path: list[str]) -> None:
    tree = Tree(VECTOR_LEAVES)
    proof = [bytes.fromhex(h) for h in path]
    assert merkle.consistency_proof(old, new, tree.node) == proof
    merkle.verify_consistency(old, new, VECTOR_ROOTS[old - 1], VECTOR_ROOTS[new - 1], proof)


# --- Against the reference, exhaustively on small trees --------------------------------------------


def test_roots_match_the_reference_on_random_sizes() -> None:
    entries = _entries(300)
    tree = Tree(entries)
    for size in [*range(0, 70), *random.Random(1).sample(range(70, 301), 40), 300]:
        expected = ref_mth(entries[:size])
        assert merkle.root([merkle.leaf_hash(e) for e in entries[:size]]) == expected, size
        assert tree.root(size) == expected, size


def test_every_inclusion_proof_up_to_300() -> None:
    entries = _entries(300)
    tree = Tree(entries)
    for size in range(1, 301):
        root = tree.root(size)
        for index in range(size):
            proof = merkle.inclusion_proof(index, size, tree.node)
            if size <= 64 or index % 7 == 0:  # the recursive reference is slow; sample the big trees
                assert proof == ref_path(index, entries[:size]), (index, size)
            assert len(proof) == merkle.inclusion_proof_length(index, size)
            merkle.verify_inclusion(tree.leaf(index), index, size, proof, root)


def test_every_consistency_proof_up_to_300() -> None:
    entries = _entries(300)
    tree = Tree(entries)
    roots = [tree.root(size) for size in range(301)]
    for new in range(0, 301):
        for old in range(0, new + 1):
            proof = merkle.consistency_proof(old, new, tree.node)
            if new <= 48 or (old * new) % 13 == 0:
                assert proof == ref_proof(old, entries[:new]), (old, new)
            assert len(proof) == merkle.consistency_proof_length(old, new)
            merkle.verify_consistency(old, new, roots[old], roots[new], proof)


def test_proofs_read_only_logarithmically_many_nodes() -> None:
    size = 1_000_003
    calls = 0

    def node(level: int, index: int) -> bytes:
        nonlocal calls
        calls += 1
        return hashlib.sha256(f"{level}/{index}".encode()).digest()

    merkle.inclusion_proof(size // 3, size, node)
    assert calls <= 2 * size.bit_length()
    assert len(merkle.inclusion_addresses(size // 3, size)) == calls
    calls = 0
    merkle.consistency_proof(size // 2 + 1, size, node)
    assert calls <= 3 * size.bit_length()


# --- Tampering -------------------------------------------------------------------------------------


def _inclusion_case(index: int = 5, size: int = 13) -> tuple[Tree, list[bytes], bytes]:
    tree = Tree(_entries(size))
    return tree, merkle.inclusion_proof(index, size, tree.node), tree.root(size)


def test_inclusion_tampering_is_refused_with_a_reason() -> None:
    tree, proof, root = _inclusion_case()
    leaf = tree.leaf(5)
    merkle.verify_inclusion(leaf, 5, 13, proof, root)
    cases: list[tuple[str, object]] = [
        ("not lead", lambda: merkle.verify_inclusion(_flip(leaf), 5, 13, proof, root)),
        ("not lead", lambda: merkle.verify_inclusion(leaf, 5, 13, proof, _flip(root))),
        ("not lead", lambda: merkle.verify_inclusion(leaf, 4, 13, proof, root)),
        ("not lead", lambda: merkle.verify_inclusion(leaf, 7, 13, proof, root)),
        ("takes", lambda: merkle.verify_inclusion(leaf, 5, 26, proof, root)),
        ("takes", lambda: merkle.verify_inclusion(leaf, 5, 6, proof, root)),
        ("takes", lambda: merkle.verify_inclusion(leaf, 5, 13, proof[:-1], root)),
        ("takes", lambda: merkle.verify_inclusion(leaf, 5, 13, [*proof, root], root)),
        ("takes", lambda: merkle.verify_inclusion(leaf, 5, 13, [root, *proof], root)),
        ("not in a tree", lambda: merkle.verify_inclusion(leaf, 13, 13, proof, root)),
        ("not in a tree", lambda: merkle.verify_inclusion(leaf, -1, 13, proof, root)),
        ("not 32", lambda: merkle.verify_inclusion(leaf[:31], 5, 13, proof, root)),
        ("not 32", lambda: merkle.verify_inclusion(leaf, 5, 13, [*proof[:-1], b"x"], root)),
    ]
    for position in range(len(proof)):
        for bit in (0, 3, 7):
            tampered = list(proof)
            tampered[position] = _flip(tampered[position], bit)
            cases.append(("not lead", lambda t=tampered: merkle.verify_inclusion(leaf, 5, 13, t, root)))
    swapped = [proof[1], proof[0], *proof[2:]]
    cases.append(("not lead", lambda: merkle.verify_inclusion(leaf, 5, 13, swapped, root)))
    for reason, attempt in cases:
        with pytest.raises(ProofError, match=reason):
            attempt()  # type: ignore[operator]


def test_inclusion_in_an_empty_or_single_tree() -> None:
    leaf = merkle.leaf_hash(b"only")
    merkle.verify_inclusion(leaf, 0, 1, [], leaf)
    with pytest.raises(ProofError, match="not lead"):
        merkle.verify_inclusion(leaf, 0, 1, [], EMPTY_ROOT)
    with pytest.raises(ProofError, match="not in a tree of size 0"):
        merkle.verify_inclusion(leaf, 0, 0, [], EMPTY_ROOT)
    with pytest.raises(ProofError, match="not in a tree"):
        merkle.inclusion_proof(0, 0, lambda level, index: leaf)


def test_consistency_tampering_is_refused_with_a_reason() -> None:
    tree = Tree(_entries(21))
    old_root, new_root = tree.root(7), tree.root(21)
    proof = merkle.consistency_proof(7, 21, tree.node)
    merkle.verify_consistency(7, 21, old_root, new_root, proof)
    cases: list[tuple[str, object]] = [
        ("old root", lambda: merkle.verify_consistency(7, 21, _flip(old_root), new_root, proof)),
        ("new root", lambda: merkle.verify_consistency(7, 21, old_root, _flip(new_root), proof)),
        ("old root|takes", lambda: merkle.verify_consistency(7, 21, new_root, old_root, proof)),
        ("takes", lambda: merkle.verify_consistency(6, 21, old_root, new_root, proof)),
        ("takes", lambda: merkle.verify_consistency(7, 42, old_root, new_root, proof)),
        ("root", lambda: merkle.verify_consistency(5, 21, old_root, new_root, proof)),
        ("takes", lambda: merkle.verify_consistency(7, 21, old_root, new_root, [])),
        ("takes", lambda: merkle.verify_consistency(7, 21, old_root, new_root, proof[:-1])),
        ("takes", lambda: merkle.verify_consistency(7, 21, old_root, new_root, [*proof, new_root])),
        ("takes", lambda: merkle.verify_consistency(7, 21, old_root, new_root, [old_root, *proof])),
        ("no consistency proof", lambda: merkle.verify_consistency(21, 7, new_root, old_root, proof)),
        ("not 32", lambda: merkle.verify_consistency(7, 21, old_root[:4], new_root, proof)),
    ]
    for position in range(len(proof)):
        tampered = list(proof)
        tampered[position] = _flip(tampered[position], 4)
        cases.append(("root", lambda t=tampered: merkle.verify_consistency(7, 21, old_root, new_root, t)))
    for reason, attempt in cases:
        with pytest.raises(ProofError, match=reason):
            attempt()  # type: ignore[operator]


def test_consistency_edge_sizes() -> None:
    tree = Tree(_entries(5))
    root = tree.root(5)
    merkle.verify_consistency(0, 5, EMPTY_ROOT, root, [])
    merkle.verify_consistency(5, 5, root, root, [])
    with pytest.raises(ProofError, match="empty tree"):
        merkle.verify_consistency(0, 5, root, root, [])
    with pytest.raises(ProofError, match="same size"):
        merkle.verify_consistency(5, 5, root, _flip(root), [])
    with pytest.raises(ProofError, match="takes 0"):
        merkle.verify_consistency(5, 5, root, root, [root])
    with pytest.raises(ProofError, match="no consistency proof"):
        merkle.consistency_proof(6, 5, tree.node)


def test_a_rewritten_history_has_no_consistency_proof() -> None:
    honest, forged = _entries(40), _entries(40)
    forged[3] = b"rewritten"
    honest_tree, forged_tree = Tree(honest), Tree(forged)
    proof = merkle.consistency_proof(10, 40, forged_tree.node)
    with pytest.raises(ProofError, match="old root"):
        merkle.verify_consistency(10, 40, honest_tree.root(10), forged_tree.root(40), proof)


# --- Speed -----------------------------------------------------------------------------------------


def test_verifying_an_inclusion_proof_in_a_million_leaf_tree_is_fast() -> None:
    size = 1_000_000
    index = 765_432
    # A path of 20 made-up siblings defines a root; verification cost does not depend on the values.
    leaf = merkle.leaf_hash(b"entry")
    proof = [hashlib.sha256(bytes([i])).digest() for i in range(merkle.inclusion_proof_length(index, size))]
    root = _root_from_path(leaf, index, size, proof)
    merkle.verify_inclusion(leaf, index, size, proof, root)
    runs = 2000
    started = time.perf_counter()
    for _ in range(runs):
        merkle.verify_inclusion(leaf, index, size, proof, root)
    per_proof = (time.perf_counter() - started) / runs
    assert per_proof < 0.0005, f"{per_proof * 1e6:.1f} µs per inclusion proof"


def _root_from_path(leaf: bytes, index: int, size: int, proof: list[bytes]) -> bytes:
    """The root a proof leads to, by RFC 6962's recursion on ranges rather than the bit loop."""
    start, end, sides = 0, size, []
    while end - start > 1:
        k = _k(end - start)
        if index < start + k:
            sides.append("right")
            end = start + k
        else:
            sides.append("left")
            start += k
    value = leaf
    for sibling, side in zip(proof, reversed(sides), strict=True):
        value = merkle.node_hash(value, sibling) if side == "right" else merkle.node_hash(sibling, value)
    return value
