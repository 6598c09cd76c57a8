"""Ed25519 verification: `identity.verify_signature` against libsodium and OpenSSL.

Every authority verifies every record's attestation, so this primitive bounds consensus
throughput (bench/RESULTS.md, "Consensus"). The run times, in one process and interleaved
passes, `identity.verify_signature` (ed25519-zebra behind libsodium's strict checks),
PyNaCl's `VerifyKey.verify` (libsodium) and `cryptography`'s `Ed25519PublicKey.verify`
(OpenSSL) over the same signatures of ~700-byte messages (an attestation's size), and
prints microseconds per verification (median of the passes) and the ratios to libsodium:

    .venv/bin/python bench/bench_verify.py [--signatures 3000] [--passes 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import nacl.signing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pyrsia_node.identity import Identity, verify_signature


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--signatures", type=int, default=3000)
    parser.add_argument("--passes", type=int, default=7)
    args = parser.parse_args()
    signer = Identity.generate()
    public_key = signer.public_key
    signed = [(m, signer.sign(m)) for m in (os.urandom(700) for _ in range(args.signatures))]
    libsodium = nacl.signing.VerifyKey(public_key)
    openssl = Ed25519PublicKey.from_public_bytes(public_key)

    def pyrsia() -> None:
        for message, signature in signed:
            if not verify_signature(public_key, signature, message):
                raise AssertionError("a valid signature was refused")

    def pynacl() -> None:
        for message, signature in signed:
            libsodium.verify(message, signature)

    def cryptography() -> None:
        for message, signature in signed:
            openssl.verify(signature, message)

    runs: dict[str, Callable[[], None]] = {
        "pyrsia_verify_signature": pyrsia,
        "pynacl_libsodium": pynacl,
        "cryptography_openssl": cryptography,
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.passes):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) / len(signed) * 1e6)
    us = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "signatures": len(signed),
        "passes": args.passes,
        "us_per_verification": {name: round(value, 1) for name, value in us.items()},
        "ratio_to_libsodium": {
            name: round(value / us["pynacl_libsodium"], 3) for name, value in us.items()
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
