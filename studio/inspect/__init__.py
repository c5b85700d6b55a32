"""Running and inspecting a merged model: a folder on disk -> loaded model -> router scores -> figures.

Imports the shared modules at the top of `studio/` only; never the builder (studio.build) or the app.
"""
