//! Keel's benchmarks: programs run by `scripts/bench NAME` that measure Keel side by side with
//! the raw library underneath (interleaved A/B rounds, same process, same run), print a table
//! and write `target/keel-bench/NAME.json`. See `BENCHMARKS.md` in the design notes.
