"""Test support shared by kvstore's tests, the conformance CLI and the benchmarks: real servers, fault proxies, the conformance suite."""
