#!/usr/bin/env bash
# Builds the Debian package: man pages and completions from the clap definitions,
# then `cargo deb` (metadata in Cargo.toml). Prints the path of the .deb.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
cargo run --quiet --locked --example gen-docs -- packaging/generated >/dev/null
cargo deb --locked 2>&1 | tail -1
