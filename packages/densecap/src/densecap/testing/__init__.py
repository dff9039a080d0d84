"""Helpers for tests and benchmarks: a tiny locally built VLM and a real vLLM server process."""
