"""Torch modules: the EleAtt recurrent core, the timm frame encoder, the sequence classifier. No data code."""
