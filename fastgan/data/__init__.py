"""fastgan.data"""
