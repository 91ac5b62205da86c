"""asv benchmark suite for seqfast (see asv.conf.json at the top of the repository).

The suite runs against old commits too, so it imports nothing from seqfast beyond what the first commit had and
turns anything missing into a skipped (NotImplementedError) benchmark instead of an import error.
"""
