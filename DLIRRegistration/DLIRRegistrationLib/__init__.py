"""DLIR Registration without Qt: MRML nodes <-> engine objects and the scene outputs of a registration.

Importable in Slicer, in Slicer's Python console, in pytest on the ``slicer-core`` wheel and under
trame-slicer: it never imports ``qt``, ``slicer.app`` or ``slicer.modules``.  Importing this package
imports nothing heavy; PyTorch is imported by the modules that need it (``registration``,
``stacks``, ``samplepair``), so the Slicer module can install it on first use.

Modules: ``volumes`` (volume node <-> SimpleITK, RAS <-> LPS), ``gridtransform`` (displacement
field -> grid transform node), ``segmentations`` (segmentation <-> label maps), ``display``
(Jacobian colours, folding colour, slice views), ``registration`` (``registerVolumes``),
``stacks`` (stack chooser, cache, modality check), ``samplepair`` (sample data, self-test body),
``scene`` (removing temporary or failed outputs).
"""
