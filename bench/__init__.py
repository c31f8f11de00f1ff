"""Benchmarks (not tests): throughput and latency next to ceilings measured in the same run."""
