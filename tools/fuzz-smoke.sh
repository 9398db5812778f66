#!/bin/bash
# A short smoke run of every fuzz target on the stable toolchain: libFuzzer without coverage
# instrumentation (that needs nightly: `cargo +nightly fuzz run TARGET fuzz/seeds/TARGET`), so
# inputs are random mutations of the seeds. It proves the targets build and survive RUNS inputs.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
RUNS=${RUNS:-20000}
cargo build -j2 --quiet
for t in $(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^tern-fuzz$'); do
    mkdir -p "seeds/$t"
    echo "fuzz smoke: $t ($RUNS runs)"
    "target/debug/$t" -runs="$RUNS" -max_len=4096 "seeds/$t" 2>&1 | tail -1
done
