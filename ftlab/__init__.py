"""ftlab: fine-tuning studies of VGG networks in JAX."""
