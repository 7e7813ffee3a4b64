"""Write kat_pqcrypto.json: a checkpoint note signed by pqcrypto's ML-DSA-65 (the Python side).

Run from the repository root: .venv/bin/python infra/fabric/chaincode/testdata/gen_kat.py
The Go tests check that circl verifies it, so the two ML-DSA-65 implementations, the key ID rule
and the note format agree. Signing is randomized, so each run writes a different (valid) vector.
"""

import base64
import hashlib
import json
import pathlib

from pqcrypto.sign import ml_dsa_65

ORIGIN = "lucerna.local/audit-log"
KEY_NAME = ORIGIN + "/key-1"
LEAVES = [f"lucerna-kat-entry-{i}".encode() for i in range(7)]


def mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 section 2.1.1 Merkle tree hash with SHA-256."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def main() -> None:
    """Generate a key, sign one checkpoint, write the vector beside this script."""
    pk, sk = ml_dsa_65.keygen()
    root = mth(LEAVES)
    text = f"{ORIGIN}\n{len(LEAVES)}\n{base64.b64encode(root).decode()}\n"
    key_id = hashlib.sha256(KEY_NAME.encode() + b"\n\xff" + b"ML-DSA-65" + pk).digest()[:4]
    sig = ml_dsa_65.sign(sk, text.encode())
    ml_dsa_65.verify(pk, text.encode(), sig)
    note = text + "\n" + f"\u2014 {KEY_NAME} {base64.b64encode(key_id + sig).decode()}\n"
    vector = {
        "origin": ORIGIN,
        "keyName": KEY_NAME,
        "publicKey": base64.b64encode(pk).decode(),
        "keyId": key_id.hex(),
        "leaves": [leaf.decode() for leaf in LEAVES],
        "treeSize": len(LEAVES),
        "rootHash": base64.b64encode(root).decode(),
        "note": note,
    }
    out = pathlib.Path(__file__).with_name("kat_pqcrypto.json")
    out.write_text(json.dumps(vector, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
