package clustertest

// EncodeProcessID returns the ProcessID half of a BackendKeyData that carries
// node id the way CockroachDB (v22.1+) encodes its SQL instance ID:
//
//   - short (long == false): top bit 0, the ID in the next 11 bits and the low
//     20 bits random: (id&0x7FF)<<20 | random&0xFFFFF. A decoder reads the ID as
//     pid>>20. The other 32 random bits of CockroachDB's 52 are the secret key.
//   - long: top bit 1 and the 31-bit ID: 0x80000000 | id&0x7FFFFFFF. All 32
//     random bits are in the secret key, so random is ignored.
//
// IDs wider than the encoding are truncated to it; Start and AddNode refuse
// them before they get here.
func EncodeProcessID(id uint32, long bool, random uint32) uint32 {
	if long {
		return 0x80000000 | id&0x7FFFFFFF
	}
	return (id&0x7FF)<<20 | random&0xFFFFF
}
