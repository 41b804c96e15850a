"""The toy world: procedural captioned shapes, their scorer, and the toy zoo's text encoder."""
