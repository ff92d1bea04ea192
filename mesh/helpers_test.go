package mesh

import "github.com/wgmesh/wgmesh/crypto"

// testKey returns a distinct, valid-looking public key.
func testKey(i int) crypto.PublicKey {
	var k crypto.PublicKey
	k[0] = byte(i + 1)
	k[31] = 0x42
	return k
}
