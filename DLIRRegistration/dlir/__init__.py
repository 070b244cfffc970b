"""DLIR: unsupervised deep-learning image registration (de Vos et al., Medical Image Analysis 2019).

The engine of the DLIR Slicer extension: pure PyTorch + SimpleITK + NumPy, no Slicer import.
Physical space is ITK's LPS in mm; every transform maps fixed-image points to moving-image points.
"""

__version__ = "0.1.0"
