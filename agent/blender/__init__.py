"""The Blender seam: the scripts podq may run, their arguments, and how Blender's output reads."""
