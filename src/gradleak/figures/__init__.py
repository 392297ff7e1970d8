"""Pictures and curves drawn by both the experiment layer and the report (Pillow and matplotlib only)."""
