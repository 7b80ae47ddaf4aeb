"""SQLite state: keys, usage ledger and the owner's runtime settings."""
