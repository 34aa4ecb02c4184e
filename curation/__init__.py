"""LVD-142M-style data curation (paper §3, App. A): embed an uncurated pool, remove
near-duplicates and copies of evaluation images, cluster it, retrieve neighbours of curated
seed sets, and sample a balanced curated manifest."""

# ``curate dedup --method``: see ``steps.dedup_step``; kept here so the CLI can list them
# without importing faiss.
DEDUP_METHODS = ("copy", "embedding", "hash")
