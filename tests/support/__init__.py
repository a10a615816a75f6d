"""Helpers for the tests only (what deformable_detr.testing holds is shared with the scripts): import them as
`from tests.support.<module> import ...`; test modules never import each other."""
