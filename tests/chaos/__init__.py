"""Reliability and security harness: crashes, outages, hostile input and load against a running node."""
