"""The Gradio studio. Widgets only: every handler calls functions that work, and are tested, without it."""
