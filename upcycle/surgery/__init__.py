"""Dense -> MoE checkpoint surgery."""
