"""txguard's pytest plugin (SPEC section 7). Being written: see issue 4."""
