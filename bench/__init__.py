"""Benchmarks: `python -m bench.<name>` prints JSON on stdout and a summary on stderr;
`python -m bench.run_all` runs them all into bench/out/. See bench/RESULTS.md."""
