"""Use cases. Each write is one transaction together with its audit event (see transaction.write)."""
