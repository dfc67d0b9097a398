"""videoxl.runtime"""
