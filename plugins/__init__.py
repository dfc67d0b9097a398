"""videoxl.plugins"""
