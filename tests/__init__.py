"""The tests: tests/<package>/test_<module>.py mirrors the code; shared helpers in
tests/support/."""
