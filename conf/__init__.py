# Makes conf/ importable as visionsweep.conf (src/visionsweep/conf links here): Hydra finds the
# configs of an installed package through pkg://visionsweep/conf. No code.
