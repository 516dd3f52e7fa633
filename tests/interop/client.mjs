// Stock Yjs client for tests/test_statesync_interop.py.
// Usage: node client.mjs <ws-base-url> <token> <session-to-read> <session-to-write>
// Prints one JSON line per event on stdout; exits when stdin says "quit".
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'
import readline from 'node:readline'

const [base, token, readId, writeId] = process.argv.slice(2)
const say = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

const doc = new Y.Doc()
const provider = new WebsocketProvider(base, 'sessions', doc, {
  WebSocketPolyfill: WebSocket, // Node 20 has no global WebSocket client y-websocket can use
  params: { token },
  disableBc: true
})
const sessions = doc.getMap('sessions')

provider.on('sync', (synced) => {
  if (!synced) return
  const value = sessions.get(readId)
  say({ event: 'read', id: readId, upstream: value ? value.upstream : null })
  const now = Date.now() / 1000
  sessions.set(writeId, { upstream: 'node-upstream', created: now, last_seen: now })
  say({ event: 'wrote', id: writeId })
})

sessions.observe((event) => {
  for (const key of event.keysChanged) {
    if (event.transaction.local) continue
    const value = sessions.get(key)
    say({ event: 'remote', id: key, upstream: value ? value.upstream : null })
  }
})

provider.on('connection-close', (ev) => say({ event: 'closed', code: ev ? ev.code : null }))

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  if (line.trim() === 'quit') {
    provider.destroy()
    doc.destroy()
    process.exit(0)
  }
})
