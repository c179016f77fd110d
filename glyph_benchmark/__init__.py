"""The embedded glyph benchmark: CJK characters as identities, font designs as their photos.

fonts.py finds one face per installed design, render.py draws centred glyphs, build.py picks
characters and writes the training RecordIO, eval_sets.py the held-out evaluation sets.
"""
