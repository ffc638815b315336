"""How a request reaches a model: the seam (``base``) and its HTTP implementation."""
