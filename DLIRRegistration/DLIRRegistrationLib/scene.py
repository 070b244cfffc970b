"""Scene bookkeeping: remove again every node added while a step runs (temporary or failed outputs)."""

from __future__ import annotations


class SceneChanges:
    """Remembers the scene's nodes; :meth:`undo` removes every node added since (display, storage and colour nodes too)."""

    def __init__(self, scene) -> None:
        self.scene = scene
        self.before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}

    def undo(self) -> None:
        added = [self.scene.GetNthNode(i) for i in range(self.scene.GetNumberOfNodes())]
        for node in reversed(added):
            if node is not None and node.GetID() not in self.before and self.scene.IsNodePresent(node):
                self.scene.RemoveNode(node)
