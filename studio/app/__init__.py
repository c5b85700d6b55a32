"""The app on top: the CLI, the Gradio UI, background jobs, progress, the workspace and the Hub.

May import every layer below it: the shared modules, studio.build and studio.inspect.
"""
