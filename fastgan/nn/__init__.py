"""fastgan.nn"""
