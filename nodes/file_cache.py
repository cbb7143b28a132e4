"""One bounded cache for models this pack loads from files (InstantFamily checkpoints, FaceID files).

ComfyUI's own node cache keeps a loader's output while a workflow uses it; this cache only spares a reload when
workflows alternate. Entries are keyed by the file's path, modification time and size (plus the load options), so a
changed file is loaded again and replaces its old entry; at most ``size`` entries stay, least recently used out.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Callable, Hashable


class FileCache:
    def __init__(self, size: int = 2):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str, options: Hashable, load: Callable[[], object]):
        """The cached value for ``path`` loaded with ``options``, else ``load()`` (outside the lock) cached."""
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_mtime_ns, st.st_size, options)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = load()
        with self._lock:
            for old in [k for k in self._items if k[0] == key[0]]:
                del self._items[old]
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def paths(self) -> list[str]:
        """The cached files, least recently used first."""
        with self._lock:
            return [k[0] for k in self._items]
