"""fastgan.optim"""
