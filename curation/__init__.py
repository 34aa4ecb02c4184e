"""LVD-142M-style data curation (paper §3, App. A): embed an uncurated pool, remove
near-duplicates and copies of evaluation images, cluster it, retrieve neighbours of curated
seed sets, and sample a balanced curated manifest."""
