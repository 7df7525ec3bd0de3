"""fastgan.metrics"""
