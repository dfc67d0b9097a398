"""videoxl.export"""
