"""d2s_ui: a local, read-only web page on top of the other packages (``d2s ui RUN_DIR``).

Search (a sentence -> images, an image -> texts, several models side by side), Corpus (shards
with their captions, verdicts, scores and grounding), Runs (bench results side by side). Nothing
else in the project imports this package (docs/architecture.md).
"""
