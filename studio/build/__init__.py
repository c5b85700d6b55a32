"""Building a merge: config -> plan -> router rows -> tensors written to a folder on disk.

Imports the shared modules at the top of `studio/` only, never the app, and never studio.inspect except
refine, which loads the written model and finds its routers as studio.inspect.routing does.
"""
