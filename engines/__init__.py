"""videoxl.engines"""
