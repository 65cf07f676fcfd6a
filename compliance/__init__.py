"""Compliance code the services call (access policy, audit chain, later de-identification)
and the documents an auditor reads."""
