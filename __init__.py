"""ComfyUI entry point of the InstantFamily node pack: registers the nodes and the model folders."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# Served by ComfyUI at /extensions/<this folder's name>/; holds only docs/<NodeClass>.md (the help pages the
# frontend's node library shows) and their images — no .js, so no frontend extension is loaded from it.
WEB_DIRECTORY = "./web"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
